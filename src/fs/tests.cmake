agorafs_add_test(fs_test ${CMAKE_CURRENT_LIST_DIR}/fs_test.cc)
agorafs_add_test(acl_test ${CMAKE_CURRENT_LIST_DIR}/acl_test.cc)
agorafs_add_test(applock_test ${CMAKE_CURRENT_LIST_DIR}/applock_test.cc)
agorafs_add_test(open_table_test ${CMAKE_CURRENT_LIST_DIR}/open_table_test.cc)
